"""The command lines, and nothing else: every `dllama-*` executable and subcommand is a module here.

    dllama_convert   dllama-convert hf / gguf / tokenizer
    dllama_validate  dllama-validate [check] MODEL [TOKENIZER.t], dllama-validate reference
    dllama_run       dllama-run [MODEL] (generate), chat, and the registration of every other subcommand:
    run_serve        dllama-run serve
    run_cluster      dllama-run worker / plan
    run_store        dllama-run list / rm (the model store, dllama/store.py)
    fetch_samples    python -m dllama.samples
    loading          MODEL -> the files to run; a model and tokenizer loaded and checked against each other
    options          the options several commands share
    command_group    what the three commands share: --version, completion, aliases, `error:` usage errors
    default_command  DefaultCommandGroup: `dllama-validate MODEL.m TOKENIZER.t` runs `check`
    edge             our errors -> one `error:` line and an exit code (the only place that does it)

The packages below (converter, tokenizer, runtime, validate) raise dllama.errors.DllamaError
subclasses and never print an error or exit.
"""
