"""``python -m nixl_connectors.tools.bench``: NIXL baseline profiles next to the local copy limit."""

import sys

from nixl_connectors.tools.bench.nixl_baseline import main

sys.exit(main())
