import sys

from llamaserve.cli import main

sys.exit(main())
