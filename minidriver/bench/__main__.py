import sys

from minidriver.bench.spawn import main

sys.exit(main())
