"""One run from launch to teardown: the controller (waiting, deadlines, signals), its stages, state files, teardown and the reaper."""
