"""Loaded by the app servers that tests/test_e2e_servers.py starts (this folder is on their
PYTHONPATH): signal DUMP_SIGNAL makes a process print every thread's stack to stderr, so a
failing test can show where a server process is stuck. A real-time signal: gunicorn and uvicorn
handle the usual ones (USR1, USR2, HUP...) themselves."""

import faulthandler
import signal

DUMP_SIGNAL = signal.SIGRTMIN + 3

faulthandler.register(DUMP_SIGNAL, all_threads=True)
