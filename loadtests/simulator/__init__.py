"""Discrete-event fleet simulator for routing policies (issue 5, part 3); see README.md.

Run: ``python -m loadtests.simulator --help``.
"""
