import sys

from replic.cli import main

sys.exit(main())
