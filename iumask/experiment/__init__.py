"""The experiment runner's parts: the spec, the statistics and the report (the stage that runs an
experiment is :mod:`iumask.stages.experiment`)."""
