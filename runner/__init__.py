"""What a run is made of around the method: its settings (settings.py), the model built from them (build.py), the run
directory (rundir.py), the step log and progress bar (train_log.py), data parallelism under torchrun
(distributed.py), the command-line wrapper (cli.py) and the evaluation report (report.py)."""
