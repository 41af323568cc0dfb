"""The spiking Q-network and its SB3 policy: neurons, input encoding, readout, the network's torsos, the
time-batched engine that runs them, and ``SpikingPolicy``. Imports no environment and writes no file."""
