"""vLLM as a real server process: launchers (python, docker), cold and swap serving, the vLLM plugin."""
