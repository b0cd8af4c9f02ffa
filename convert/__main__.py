import sys

from convert.convert import main

sys.exit(main())
