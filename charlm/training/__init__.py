"""A training run in small steps; charlm.trainer.train() puts them together.

    paths.py     where a run's files go: the next free name, the run --resume continues
    events.py    what a run reports (Started, Stepped, Evaluated, Note) and returns (TrainResult)
    resume.py    resume decided in one place: the run's settings with the caller's changes on top
    setup.py     set-up functions, each returning one typed piece: devices, data, model and optimiser
    schedule.py  the learning-rate schedule and how often to validate
    optim.py     AdamW and its state as checkpoint tensors
    finetune.py  --init-from: a model grown to a vocab with new characters
    clock.py     the run's clocks and the time the final validation and saves will need
    stop.py      Ctrl-C and SIGTERM ask for a stop at the next step
    metrics_log.py  the .metrics.jsonl file
    loop.py      the loop: step, evaluate, save, emit events

RunState, the counters a checkpoint carries, is charlm/run_state.py: checkpoint.py, below this
package, validates it. Nothing here is imported by `import charlm`; paths.py needs no torch.
"""
