"""The command lines, and nothing else: every `dllama-*` executable and subcommand is a module here.

    dllama_convert   dllama-convert hf / gguf / tokenizer
    dllama_validate  dllama-validate [check] MODEL.m TOKENIZER.t, dllama-validate reference
    dllama_run       dllama-run (generate), chat, and the registration of every other subcommand:
    run_serve        dllama-run serve
    run_cluster      dllama-run worker / plan
    fetch_samples    python -m dllama.samples
    loading          a model and tokenizer loaded and checked against each other (run, chat, serve)
    options          the options several commands share
    default_command  DefaultCommandGroup: `dllama-validate MODEL.m TOKENIZER.t` runs `check`
    edge             our errors -> one `error:` line and an exit code (the only place that does it)

The packages below (converter, tokenizer, runtime, validate) raise dllama.errors.DllamaError
subclasses and never print an error or exit.
"""
