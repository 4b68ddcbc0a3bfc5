"""iumask."""
