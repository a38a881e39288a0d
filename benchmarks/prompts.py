"""Prompts the generation benchmarks share (verses from the built-in corpus's world)."""

PROMPTS = [
    "And God said, Let there be light",
    "The LORD is my shepherd; I shall not want.",
    "In the beginning was the Word, and the Word was with God,",
    "And the children of Israel went up out of the land of Egypt",
    "Blessed are the poor in spirit: for theirs is the kingdom",
    "Now the serpent was more subtil than any beast of the field",
    "And Moses said unto the people, Fear ye not",
    "For God so loved the world, that he gave his only begotten Son",
    "Vanity of vanities, saith the Preacher, vanity of vanities;",
    "Then answered Peter and said unto him, Behold,",
    "And it came to pass in those days, that there went out a decree",
    "By the rivers of Babylon, there we sat down, yea, we wept,",
]
