import sys

from longseq.cli import main

sys.exit(main())
