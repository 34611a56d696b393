"""The command-line entry points as functions a warm pool rank can run (dist_run needs module-level functions):
each parses argv exactly as the script would and returns its exit code."""


def pretrain(argv):
    from megamoe.training.loop import pretrain as run

    return run(argv)


def eval_lm(argv):
    from tools.eval_lm import main

    return main(argv)


def generate(argv):
    from tools.generate import main

    return main(argv)
