"""`python -m bridge` is the same as the `mqtt-kafka-bridge` console script."""

from bridge.cli import main

raise SystemExit(main())
