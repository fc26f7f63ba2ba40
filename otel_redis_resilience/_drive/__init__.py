"""Thin sync and asyncio drivers: the I/O, the sleeping, the connection hooks."""
