"""The forward process and the way back: the noise schedule, what the network predicts (objectives), the samplers
over one ε-model contract, the settings a sampling call takes, editing (SDEdit, RePaint, inversion), the denoiser
that puts a trained network behind the contract, and the time slider's frames."""
