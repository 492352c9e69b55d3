"""Assets for the CPU demo: the generated shapes data set (`demo.shapes`), tiny random models
(`demo.tiny_models`) and the one-call preparation (`demo.prepare`). Nothing runs on import."""
