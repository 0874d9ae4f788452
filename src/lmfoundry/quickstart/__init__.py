"""lmfoundry quickstart: the SOLAR recipe end to end on embedded defaults (see pipeline.py)."""
