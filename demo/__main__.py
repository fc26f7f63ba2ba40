"""``python -m demo``: run the outage demo (see :mod:`demo.run` for the options)."""

from demo.run import main

raise SystemExit(main())
