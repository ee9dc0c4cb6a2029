"""XLA flags of the test processes and of the processes the tests launch."""

# Tests compile many tiny programs and run each for a few steps, so LLVM's optimisation of the generated code costs
# more than it saves: at level 0 a tiny training test spent ~25 % less CPU (jit(init) 8.6 s -> 4.5 s, the train step
# 11.4 s -> 7.6 s). The programs compute the same functions; every parity tolerance holds at this level.
COMPILE_FLAGS = "--xla_backend_optimization_level=0"

# A program that runs hundreds of steps (the toy trainings of the head tests) wins back its optimised compile many
# times over: jit it with these options (the toy diffusion U-Net's 400 steps: 58 s at level 0, 13 s here).
OPTIMISED = {"xla_backend_optimization_level": 3}


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test process: the compile flags, and `devices` fake CPU devices when given (else one)."""
    forced = f"--xla_force_host_platform_device_count={devices} " if devices else ""
    return forced + COMPILE_FLAGS
