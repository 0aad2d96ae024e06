"""BEiT's stage 1: discrete image tokenizers trained on the dataset itself.

  codebook.py   the EMA-updated VQ codebook (Laplace smoothing, dead-code restarts, usage)
  models.py     the convolutional encoder / decoder, one code per patch of the BEiT grid;
                encode / tokenize / decode with a trained tokenizer
  vq.py         the "vq_tokenizer" training method
  vqkd.py       the "vqkd_tokenizer" method (BEiT v2): codes that reconstruct a frozen
                teacher's features through an l2-normalised codebook
  dvae.py       the "dvae_tokenizer" method (Gumbel-softmax, annealed temperature, KL prior)
  io.py         the export layout (WORKDIR/tokenizer/) and loading it for BEiT
  usage.py      codebook usage of a trained tokenizer over a whole split (a command line)
"""
