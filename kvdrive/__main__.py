import sys

from kvdrive.cli import main

sys.exit(main())
