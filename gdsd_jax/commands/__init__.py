"""One module per ``gdsd-jax`` sub-command (``HELP``, ``add_arguments(parser)``, ``run(args) -> int``).

``gdsd-jax --help`` imports every command module to build its parser, so a command imports the library it
drives (JAX, the models, the trainer) inside ``run``: the help and a command's argument errors stay fast,
and ``plan`` can set XLA's flags before JAX loads. Light imports (argument parsing, config files) are at the
top of each module.
"""
