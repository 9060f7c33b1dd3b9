"""The training commands of the `ensam` tool (a front-end: the work is done by core/).

  commands       `ensam train`, `ensam coreset`, `ensam train-bench`; ``register(subparsers)``,
                 which ENSAMSegmentLib/cli/main.py calls when ENSAMTrainingLib is installed
  data_commands  `ensam data fetch` and `ensam data prepare`

Building the parsers imports no torch (Testing/cli/test_cli_startup.py).
"""
