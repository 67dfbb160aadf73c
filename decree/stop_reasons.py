"""Why an inversion ended (InversionResult.stop_reason), and the sentence that says so in the log and on stderr."""
STOP_EARLY, STOP_BUDGET, STOP_VERDICT = "early stop", "epoch budget", "exact early exit"
STOP_SLOW = "slow progress"  # --min_progress: stopped before the paper's early stop; the PL1 is an upper bound
UPPER_BOUND_STOPS = (STOP_VERDICT, STOP_SLOW)


def stop_message(result, cfg) -> str:
    """One line: why the run ended (the reason of the restart that gave the InversionResult `result`)."""
    why = {STOP_EARLY: f"early stop: the best L1 did not improve for more than {cfg.early_stop_patience} steps "
                       f"while the epoch's mean |cos| was above {cfg.thres}",
           STOP_BUDGET: f"epoch budget: --epochs {cfg.max_epochs} reached",
           STOP_VERDICT: f"exact early exit: PL1 fell below the threshold {cfg.pl1_threshold} and can only fall "
                         "further, so the verdict is final (the PL1 is an upper bound)",
           STOP_SLOW: f"slow progress: for more than {cfg.early_stop_patience} steps the best PL1 fell by less than "
                      f"{cfg.min_progress:g} of its distance to the threshold {cfg.pl1_threshold} (--min_progress), "
                      "while the epoch's mean |cos| was above "
                      f"{cfg.thres}; the paper's run would go on and could only lower the PL1, so it is an upper "
                      "bound"}[result.stop_reason]
    return f"DECREE stopped after {result.epochs} epochs ({result.seconds:.1f} s): {why}"
