"""Task entry points run by launch.py: each module has run(config, workdir)."""
