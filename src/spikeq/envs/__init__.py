"""What the agent sees and remembers: the Atari protocol (``atari``, ``vector``), the MinAtar games
(``minatar``), the entry point over both families (``games``) and the replay buffer (``replay``)."""
