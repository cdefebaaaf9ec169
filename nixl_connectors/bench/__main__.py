"""``python -m nixl_connectors.bench``: NIXL baseline profiles next to the local copy limit."""

import sys

from nixl_connectors.bench.nixl_baseline import main

sys.exit(main())
