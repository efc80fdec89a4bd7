import sys

from minidriver.cli import main

sys.exit(main())
