"""Tests of one backend's behaviour at a time, against the real thing."""
