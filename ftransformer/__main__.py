import sys

from ftransformer.cli import main

sys.exit(main())
