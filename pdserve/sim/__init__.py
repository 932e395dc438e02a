"""Discrete-event cluster simulator (``pdserve sim``) and planner (``pdserve plan``)."""
