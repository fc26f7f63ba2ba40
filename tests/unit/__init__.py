"""Tests without Redis and without a clock: the decision floor, fed fake time."""
