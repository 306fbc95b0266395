import sys

from clpeft.cli import main

sys.exit(main())
