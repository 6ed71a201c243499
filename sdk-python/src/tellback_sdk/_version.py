__version__ = "0.1.0"
SDK_NAME = f"tellback-python/{__version__}"
