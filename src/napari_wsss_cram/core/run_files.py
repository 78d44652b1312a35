"""The files of a training run folder, named in a module without torch: the Train dock asks for them when it
opens, and importing ``core.train`` (torch) there froze napari for seconds."""

LAST = "last.pt"
RESUME = "resume.pt"  # model + optimiser + scheduler + scaler + RNG + step, for --resume
BEST = "best.pt"
