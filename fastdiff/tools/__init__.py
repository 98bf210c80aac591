"""Developer tools run as ``python -m fastdiff.tools.<name>`` (not imported by fastdiff itself)."""
