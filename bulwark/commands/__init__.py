"""Sub-commands of ``bulwark``: one module each, with ``add_parser`` and ``run``.

Modules are imported only when their command runs, so ``bulwark serve`` never loads torch and
``bulwark pretrain`` never loads the web stack.
"""
