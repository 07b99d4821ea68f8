"""ImageNet-1k class names and prompt templates for zero-shot classification.

Data only (no imports), so that configs and the CLI may read it for free.

* :data:`IMAGENET_CLASSES`: the 1000 ImageNet-1k class names in label order
  (index ``i`` names tfds ``imagenet2012`` label ``i``), the cleaned-up names
  OpenAI published with CLIP's ImageNet prompt-engineering notebook, which
  big_vision's SigLIP evaluators use too (``CLIP_IMAGENET_CLASS_NAMES``).
* :data:`CLIP_TEMPLATES`: the 80 prompt templates of the CLIP paper's ImageNet
  ensemble (``"a bad photo of a {}."``, ...). big_vision's ``clip_paper`` set is
  these plus the bare class name ``"{}"``: :data:`BIG_VISION_TEMPLATES`.
* :data:`TEMPLATES`: the names ``--config.zeroshot.templates`` accepts.

big_vision also canonicalises names and templates (lower case, punctuation
dropped) before tokenising; SigLIP's tokeniser lowers ASCII anyway
(``mame_jax.tokenizers``), the punctuation is kept here.
"""

IMAGENET_CLASSES = (
    # (the comment: the label of the line's first name)
    "tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark",  # 0
    "electric ray", "stingray", "rooster", "hen", "ostrich", "brambling", "goldfinch",  # 5
    "house finch", "junco", "indigo bunting", "American robin", "bulbul", "jay", "magpie",  # 12
    "chickadee", "American dipper", "kite (bird of prey)", "bald eagle", "vulture",  # 19
    "great grey owl", "fire salamander", "smooth newt", "newt", "spotted salamander",  # 24
    "axolotl", "American bullfrog", "tree frog", "tailed frog", "loggerhead sea turtle",  # 29
    "leatherback sea turtle", "mud turtle", "terrapin", "box turtle", "banded gecko",  # 34
    "green iguana", "Carolina anole", "desert grassland whiptail lizard", "agama",  # 39
    "frilled-necked lizard", "alligator lizard", "Gila monster", "European green lizard",  # 43
    "chameleon", "Komodo dragon", "Nile crocodile", "American alligator", "triceratops",  # 47
    "worm snake", "ring-necked snake", "eastern hog-nosed snake", "smooth green snake",  # 52
    "kingsnake", "garter snake", "water snake", "vine snake", "night snake",  # 56
    "boa constrictor", "African rock python", "Indian cobra", "green mamba", "sea snake",  # 61
    "Saharan horned viper", "eastern diamondback rattlesnake", "sidewinder rattlesnake",  # 66
    "trilobite", "harvestman", "scorpion", "yellow garden spider", "barn spider",  # 69
    "European garden spider", "southern black widow", "tarantula", "wolf spider", "tick",  # 74
    "centipede", "black grouse", "ptarmigan", "ruffed grouse", "prairie grouse",  # 79
    "peafowl", "quail", "partridge", "african grey parrot", "macaw",  # 84
    "sulphur-crested cockatoo", "lorikeet", "coucal", "bee eater", "hornbill",  # 89
    "hummingbird", "jacamar", "toucan", "duck", "red-breasted merganser", "goose",  # 94
    "black swan", "tusker", "echidna", "platypus", "wallaby", "koala", "wombat",  # 100
    "jellyfish", "sea anemone", "brain coral", "flatworm", "nematode", "conch", "snail",  # 107
    "slug", "sea slug", "chiton", "chambered nautilus", "Dungeness crab", "rock crab",  # 114
    "fiddler crab", "red king crab", "American lobster", "spiny lobster", "crayfish",  # 120
    "hermit crab", "isopod", "white stork", "black stork", "spoonbill", "flamingo",  # 125
    "little blue heron", "great egret", "bittern bird", "crane bird", "limpkin",  # 131
    "common gallinule", "American coot", "bustard", "ruddy turnstone", "dunlin",  # 136
    "common redshank", "dowitcher", "oystercatcher", "pelican", "king penguin",  # 141
    "albatross", "grey whale", "killer whale", "dugong", "sea lion", "Chihuahua",  # 146
    "Japanese Chin", "Maltese", "Pekingese", "Shih Tzu", "King Charles Spaniel",  # 152
    "Papillon", "toy terrier", "Rhodesian Ridgeback", "Afghan Hound", "Basset Hound",  # 157
    "Beagle", "Bloodhound", "Bluetick Coonhound", "Black and Tan Coonhound",  # 162
    "Treeing Walker Coonhound", "English foxhound", "Redbone Coonhound", "borzoi",  # 166
    "Irish Wolfhound", "Italian Greyhound", "Whippet", "Ibizan Hound",  # 170
    "Norwegian Elkhound", "Otterhound", "Saluki", "Scottish Deerhound", "Weimaraner",  # 174
    "Staffordshire Bull Terrier", "American Staffordshire Terrier", "Bedlington Terrier",  # 179
    "Border Terrier", "Kerry Blue Terrier", "Irish Terrier", "Norfolk Terrier",  # 182
    "Norwich Terrier", "Yorkshire Terrier", "Wire Fox Terrier", "Lakeland Terrier",  # 186
    "Sealyham Terrier", "Airedale Terrier", "Cairn Terrier", "Australian Terrier",  # 190
    "Dandie Dinmont Terrier", "Boston Terrier", "Miniature Schnauzer", "Giant Schnauzer",  # 194
    "Standard Schnauzer", "Scottish Terrier", "Tibetan Terrier",  # 198
    "Australian Silky Terrier", "Soft-coated Wheaten Terrier",  # 201
    "West Highland White Terrier", "Lhasa Apso", "Flat-Coated Retriever",  # 203
    "Curly-coated Retriever", "Golden Retriever", "Labrador Retriever",  # 206
    "Chesapeake Bay Retriever", "German Shorthaired Pointer", "Vizsla", "English Setter",  # 209
    "Irish Setter", "Gordon Setter", "Brittany dog", "Clumber Spaniel",  # 213
    "English Springer Spaniel", "Welsh Springer Spaniel", "Cocker Spaniel",  # 217
    "Sussex Spaniel", "Irish Water Spaniel", "Kuvasz", "Schipperke", "Groenendael dog",  # 220
    "Malinois", "Briard", "Australian Kelpie", "Komondor", "Old English Sheepdog",  # 225
    "Shetland Sheepdog", "collie", "Border Collie", "Bouvier des Flandres dog",  # 230
    "Rottweiler", "German Shepherd Dog", "Dobermann", "Miniature Pinscher",  # 234
    "Greater Swiss Mountain Dog", "Bernese Mountain Dog", "Appenzeller Sennenhund",  # 238
    "Entlebucher Sennenhund", "Boxer", "Bullmastiff", "Tibetan Mastiff",  # 241
    "French Bulldog", "Great Dane", "St. Bernard", "husky", "Alaskan Malamute",  # 245
    "Siberian Husky", "Dalmatian", "Affenpinscher", "Basenji", "pug", "Leonberger",  # 250
    "Newfoundland dog", "Great Pyrenees dog", "Samoyed", "Pomeranian", "Chow Chow",  # 256
    "Keeshond", "brussels griffon", "Pembroke Welsh Corgi", "Cardigan Welsh Corgi",  # 261
    "Toy Poodle", "Miniature Poodle", "Standard Poodle",  # 265
    "Mexican hairless dog (xoloitzcuintli)", "grey wolf", "Alaskan tundra wolf",  # 268
    "red wolf or maned wolf", "coyote", "dingo", "dhole", "African wild dog", "hyena",  # 271
    "red fox", "kit fox", "Arctic fox", "grey fox", "tabby cat", "tiger cat",  # 277
    "Persian cat", "Siamese cat", "Egyptian Mau", "cougar", "lynx", "leopard",  # 283
    "snow leopard", "jaguar", "lion", "tiger", "cheetah", "brown bear",  # 289
    "American black bear", "polar bear", "sloth bear", "mongoose", "meerkat",  # 295
    "tiger beetle", "ladybug", "ground beetle", "longhorn beetle", "leaf beetle",  # 300
    "dung beetle", "rhinoceros beetle", "weevil", "fly", "bee", "ant", "grasshopper",  # 305
    "cricket insect", "stick insect", "cockroach", "praying mantis", "cicada",  # 312
    "leafhopper", "lacewing", "dragonfly", "damselfly", "red admiral butterfly",  # 317
    "ringlet butterfly", "monarch butterfly", "small white butterfly",  # 322
    "sulphur butterfly", "gossamer-winged butterfly", "starfish", "sea urchin",  # 325
    "sea cucumber", "cottontail rabbit", "hare", "Angora rabbit", "hamster", "porcupine",  # 329
    "fox squirrel", "marmot", "beaver", "guinea pig", "common sorrel horse", "zebra",  # 335
    "pig", "wild boar", "warthog", "hippopotamus", "ox", "water buffalo", "bison",  # 341
    "ram (adult male sheep)", "bighorn sheep", "Alpine ibex", "hartebeest",  # 348
    "impala (antelope)", "gazelle", "arabian camel", "llama", "weasel", "mink",  # 352
    "European polecat", "black-footed ferret", "otter", "skunk", "badger", "armadillo",  # 358
    "three-toed sloth", "orangutan", "gorilla", "chimpanzee", "gibbon", "siamang",  # 364
    "guenon", "patas monkey", "baboon", "macaque", "langur", "black-and-white colobus",  # 370
    "proboscis monkey", "marmoset", "white-headed capuchin", "howler monkey",  # 376
    "titi monkey", "Geoffroy's spider monkey", "common squirrel monkey",  # 380
    "ring-tailed lemur", "indri", "Asian elephant", "African bush elephant", "red panda",  # 383
    "giant panda", "snoek fish", "eel", "silver salmon", "rock beauty fish", "clownfish",  # 388
    "sturgeon", "gar fish", "lionfish", "pufferfish", "abacus", "abaya", "academic gown",  # 394
    "accordion", "acoustic guitar", "aircraft carrier", "airliner", "airship", "altar",  # 401
    "ambulance", "amphibious vehicle", "analog clock", "apiary", "apron", "trash can",  # 407
    "assault rifle", "backpack", "bakery", "balance beam", "balloon", "ballpoint pen",  # 413
    "Band-Aid", "banjo", "baluster / handrail", "barbell", "barber chair", "barbershop",  # 419
    "barn", "barometer", "barrel", "wheelbarrow", "baseball", "basketball", "bassinet",  # 425
    "bassoon", "swimming cap", "bath towel", "bathtub", "station wagon", "lighthouse",  # 432
    "beaker", "military hat (bearskin or shako)", "beer bottle", "beer glass",  # 438
    "bell tower", "baby bib", "tandem bicycle", "bikini", "ring binder", "binoculars",  # 442
    "birdhouse", "boathouse", "bobsleigh", "bolo tie", "poke bonnet", "bookcase",  # 448
    "bookstore", "bottle cap", "hunting bow", "bow tie", "brass memorial plaque", "bra",  # 454
    "breakwater", "breastplate", "broom", "bucket", "buckle", "bulletproof vest",  # 460
    "high-speed train", "butcher shop", "taxicab", "cauldron", "candle", "cannon",  # 466
    "canoe", "can opener", "cardigan", "car mirror", "carousel", "tool kit",  # 472
    "cardboard box / carton", "car wheel", "automated teller machine", "cassette",  # 478
    "cassette player", "castle", "catamaran", "CD player", "cello", "mobile phone",  # 482
    "chain", "chain-link fence", "chain mail", "chainsaw", "storage chest", "chiffonier",  # 488
    "bell or wind chime", "china cabinet", "Christmas stocking", "church",  # 494
    "movie theater", "cleaver", "cliff dwelling", "cloak", "clogs", "cocktail shaker",  # 498
    "coffee mug", "coffeemaker", "spiral or coil", "combination lock",  # 504
    "computer keyboard", "candy store", "container ship", "convertible", "corkscrew",  # 508
    "cornet", "cowboy boot", "cowboy hat", "cradle", "construction crane",  # 513
    "crash helmet", "crate", "infant bed", "Crock Pot", "croquet ball", "crutch",  # 518
    "cuirass", "dam", "desk", "desktop computer", "rotary dial telephone", "diaper",  # 524
    "digital clock", "digital watch", "dining table", "dishcloth", "dishwasher",  # 530
    "disc brake", "dock", "dog sled", "dome", "doormat", "drilling rig", "drum",  # 535
    "drumstick", "dumbbell", "Dutch oven", "electric fan", "electric guitar",  # 542
    "electric locomotive", "entertainment center", "envelope", "espresso machine",  # 547
    "face powder", "feather boa", "filing cabinet", "fireboat", "fire truck",  # 551
    "fire screen", "flagpole", "flute", "folding chair", "football helmet", "forklift",  # 556
    "fountain", "fountain pen", "four-poster bed", "freight car", "French horn",  # 562
    "frying pan", "fur coat", "garbage truck", "gas mask or respirator", "gas pump",  # 567
    "goblet", "go-kart", "golf ball", "golf cart", "gondola", "gong", "gown",  # 572
    "grand piano", "greenhouse", "radiator grille", "grocery store", "guillotine",  # 579
    "hair clip", "hair spray", "half-track", "hammer", "hamper", "hair dryer",  # 584
    "hand-held computer", "handkerchief", "hard disk drive", "harmonica", "harp",  # 590
    "combine harvester", "hatchet", "holster", "home theater", "honeycomb", "hook",  # 595
    "hoop skirt", "gymnastic horizontal bar", "horse-drawn vehicle", "hourglass", "iPod",  # 601
    "clothes iron", "carved pumpkin", "jeans", "jeep", "T-shirt", "jigsaw puzzle",  # 606
    "rickshaw", "joystick", "kimono", "knee pad", "knot", "lab coat", "ladle",  # 612
    "lampshade", "laptop computer", "lawn mower", "lens cap", "letter opener", "library",  # 619
    "lifeboat", "lighter", "limousine", "ocean liner", "lipstick", "slip-on shoe",  # 625
    "lotion", "music speaker", "loupe magnifying glass", "sawmill", "magnetic compass",  # 631
    "messenger bag", "mailbox", "tights", "one-piece bathing suit", "manhole cover",  # 636
    "maraca", "marimba", "mask", "matchstick", "maypole", "maze", "measuring cup",  # 641
    "medicine cabinet", "megalith", "microphone", "microwave oven", "military uniform",  # 648
    "milk can", "minibus", "miniskirt", "minivan", "missile", "mitten", "mixing bowl",  # 653
    "mobile home", "ford model t", "modem", "monastery", "monitor", "moped",  # 660
    "mortar and pestle", "graduation cap", "mosque", "mosquito net", "vespa",  # 666
    "mountain bike", "tent", "computer mouse", "mousetrap", "moving van", "muzzle",  # 671
    "metal nail", "neck brace", "necklace", "baby pacifier", "notebook computer",  # 677
    "obelisk", "oboe", "ocarina", "odometer", "oil filter", "pipe organ", "oscilloscope",  # 682
    "overskirt", "bullock cart", "oxygen mask", "product packet / packaging", "paddle",  # 689
    "paddle wheel", "padlock", "paintbrush", "pajamas", "palace", "pan flute",  # 694
    "paper towel", "parachute", "parallel bars", "park bench", "parking meter",  # 700
    "railroad car", "patio", "payphone", "pedestal", "pencil case", "pencil sharpener",  # 705
    "perfume", "Petri dish", "photocopier", "plectrum", "Pickelhaube", "picket fence",  # 711
    "pickup truck", "pier", "piggy bank", "pill bottle", "pillow", "ping-pong ball",  # 717
    "pinwheel", "pirate ship", "drink pitcher", "block plane", "planetarium",  # 723
    "plastic bag", "plate rack", "farm plow", "plunger", "Polaroid camera", "pole",  # 728
    "police van", "poncho", "pool table", "soda bottle", "plant pot", "potter's wheel",  # 734
    "power drill", "prayer rug", "printer", "prison", "missile", "projector",  # 740
    "hockey puck", "punching bag", "purse", "quill", "quilt", "race car", "racket",  # 746
    "radiator", "radio", "radio telescope", "rain barrel", "recreational vehicle",  # 753
    "fishing casting reel", "reflex camera", "refrigerator", "remote control",  # 758
    "restaurant", "revolver", "rifle", "rocking chair", "rotisserie", "eraser",  # 762
    "rugby ball", "ruler measuring stick", "sneaker", "safe", "safety pin",  # 768
    "salt shaker", "sandal", "sarong", "saxophone", "scabbard", "weighing scale",  # 773
    "school bus", "schooner", "scoreboard", "CRT monitor", "screw", "screwdriver",  # 779
    "seat belt", "sewing machine", "shield", "shoe store", "shoji screen / room divider",  # 785
    "shopping basket", "shopping cart", "shovel", "shower cap", "shower curtain", "ski",  # 790
    "balaclava ski mask", "sleeping bag", "slide rule", "sliding door", "slot machine",  # 796
    "snorkel", "snowmobile", "snowplow", "soap dispenser", "soccer ball", "sock",  # 801
    "solar thermal collector", "sombrero", "soup bowl", "keyboard space bar",  # 807
    "space heater", "space shuttle", "spatula", "motorboat", "spider web", "spindle",  # 811
    "sports car", "spotlight", "stage", "steam locomotive", "through arch bridge",  # 817
    "steel drum", "stethoscope", "scarf", "stone wall", "stopwatch", "stove", "strainer",  # 822
    "tram", "stretcher", "couch", "stupa", "submarine", "suit", "sundial", "sunglasses",  # 829
    "sunglasses", "sunscreen", "suspension bridge", "mop", "sweatshirt",  # 837
    "swim trunks / shorts", "swing", "electrical switch", "syringe", "table lamp",  # 842
    "tank", "tape player", "teapot", "teddy bear", "television", "tennis ball",  # 847
    "thatched roof", "front curtain", "thimble", "threshing machine", "throne",  # 853
    "tile roof", "toaster", "tobacco shop", "toilet seat", "torch", "totem pole",  # 858
    "tow truck", "toy store", "tractor", "semi-trailer truck", "tray", "trench coat",  # 864
    "tricycle", "trimaran", "tripod", "triumphal arch", "trolleybus", "trombone",  # 870
    "hot tub", "turnstile", "typewriter keyboard", "umbrella", "unicycle",  # 876
    "upright piano", "vacuum cleaner", "vase", "vaulted or arched ceiling",  # 881
    "velvet fabric", "vending machine", "vestment", "viaduct", "violin", "volleyball",  # 885
    "waffle iron", "wall clock", "wallet", "wardrobe", "military aircraft", "sink",  # 891
    "washing machine", "water bottle", "water jug", "water tower", "whiskey jug",  # 897
    "whistle", "hair wig", "window screen", "window shade", "Windsor tie", "wine bottle",  # 902
    "airplane wing", "wok", "wooden spoon", "wool", "split-rail fence", "shipwreck",  # 908
    "sailboat", "yurt", "website", "comic book", "crossword", "traffic or street sign",  # 914
    "traffic light", "dust jacket", "menu", "plate", "guacamole", "consomme", "hot pot",  # 920
    "trifle", "ice cream", "popsicle", "baguette", "bagel", "pretzel", "cheeseburger",  # 927
    "hot dog", "mashed potatoes", "cabbage", "broccoli", "cauliflower", "zucchini",  # 934
    "spaghetti squash", "acorn squash", "butternut squash", "cucumber", "artichoke",  # 940
    "bell pepper", "cardoon", "mushroom", "Granny Smith apple", "strawberry", "orange",  # 945
    "lemon", "fig", "pineapple", "banana", "jackfruit", "cherimoya (custard apple)",  # 951
    "pomegranate", "hay", "carbonara", "chocolate syrup", "dough", "meatloaf", "pizza",  # 957
    "pot pie", "burrito", "red wine", "espresso", "tea cup", "eggnog", "mountain",  # 964
    "bubble", "cliff", "coral reef", "geyser", "lakeshore", "promontory", "sandbar",  # 971
    "beach", "valley", "volcano", "baseball player", "bridegroom", "scuba diver",  # 978
    "rapeseed", "daisy", "yellow lady's slipper", "corn", "acorn", "rose hip",  # 984
    "horse chestnut seed", "coral fungus", "agaric", "gyromitra", "stinkhorn mushroom",  # 990
    "earth star fungus", "hen of the woods mushroom", "bolete", "corn cob",  # 995
    "toilet paper",  # 999
)

CLIP_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

BIG_VISION_TEMPLATES = CLIP_TEMPLATES + ("{}",)

CLASSES = {"imagenet": IMAGENET_CLASSES}
TEMPLATES = {"clip": CLIP_TEMPLATES, "big_vision": BIG_VISION_TEMPLATES}
