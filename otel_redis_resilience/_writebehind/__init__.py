"""The durable write-behind journal and its exactly-once replay."""
