import sys

from cleave.expert.main import run_command

sys.exit(run_command("expert", sys.argv[1:]))
