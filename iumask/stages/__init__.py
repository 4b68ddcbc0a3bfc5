"""The pipeline's stages. Each takes configuration objects (:mod:`iumask.config`), writes one kind
of artifact, and is a cache hit when that artifact already matches its inputs."""
