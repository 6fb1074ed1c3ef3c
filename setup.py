from setuptools import find_packages, setup

setup(
    name="widthkit",
    version="0.1.0",
    description="Measure how wide a neural network's optimum is: rays, lines and planes in weight space (SWA vs SGD).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["widthkit", "widthkit.*"]),
    package_data={"widthkit.training": ["recipes/*.toml"]},
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "numpy",
        "scipy",
        "matplotlib>=3.8",
        "h5py",
        "tqdm",
        "scikit-learn",
    ],
    extras_require={"test": ["pytest", "pytest-timeout"], "timm": ["timm"]},
)
