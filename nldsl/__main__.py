import sys

from nldsl.cli import main

sys.exit(main())
