"""Writes tests/data/sentences_gold.jsonl: long captions with gold sentence boundaries (ours, none copied).

Each caption is built from hand-written sentences in the manner of recaptioned corpora (ShareGPT4V, DCI, DOCCI,
PixelProse, DreamLIP, LLaVA-style recaptions); the tricky sentences carry the cases a splitter gets wrong
(abbreviations and titles, initials, decimals, measures and times, quotes and parentheses with terminal
punctuation inside, ellipses, list items with and without final punctuation, colons before lists, URLs, e-mail
addresses, file names, numbered steps, no final punctuation). A line: {"id", "style", "text", "sentences"}:
`text` is the raw caption and `sentences` its gold sentences after pipeline.sentences.normalize (bullets and
numbers at line starts and bold markers removed). Deterministic: `python tests/data/make_sentence_gold.py`.
"""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

# ---- plain descriptive sentences (one sentence each)
PLAIN = [
    "A wooden bench stands beside a narrow gravel path.",
    "Tall pine trees line the far edge of the meadow.",
    "The sky is pale blue with a few thin clouds.",
    "A woman in a red coat walks a small brown dog.",
    "Soft afternoon light falls across the tiled floor.",
    "Two ceramic mugs sit on the windowsill, one of them chipped.",
    "The walls are painted a muted sage green.",
    "In the background, a row of brick houses recedes into haze.",
    "A bicycle with a wicker basket leans against the fence.",
    "The water in the harbour is calm and reflects the boats.",
    "Several pigeons peck at crumbs near an overflowing bin.",
    "A child in yellow rain boots jumps into a puddle.",
    "The kitchen counter is cluttered with jars, bowls and a cutting board.",
    "Bright string lights hang in loose loops above the patio.",
    "A grey cat sleeps curled up on a knitted blanket.",
    "The road curves to the left and disappears behind a hill.",
    "Snow covers the rooftops and the parked cars.",
    "A vase of sunflowers stands in the centre of the table.",
    "The photograph is taken from a low angle, looking up at the tower.",
    "Shadows from the railings form long stripes on the steps.",
    "A man in a blue apron arranges loaves of bread on a shelf.",
    "The left half of the frame is dominated by a large oak tree.",
    "Rows of vegetables grow in raised wooden beds.",
    "A red double-decker bus waits at the traffic lights.",
    "The image has a warm, slightly faded colour palette.",
    "Wet cobblestones glisten under the street lamps.",
    "A laptop, a notebook and a pair of glasses rest on the desk.",
    "The mountains in the distance are capped with snow.",
    "An old lighthouse stands at the end of a rocky pier.",
    "Three children sit cross-legged on a rug, reading picture books.",
    "The curtains are drawn halfway, letting in a strip of sunlight.",
    "A stack of folded towels sits on a white wicker chair.",
    "The market stall is shaded by a striped canvas awning.",
    "Green ivy climbs the stone wall on the right.",
    "A small boat with an outboard motor is tied to the dock.",
    "The overall mood of the scene is calm and quiet.",
    "Behind the counter, a chalkboard lists the daily specials.",
    "A white horse grazes in a field bordered by a wire fence.",
    "The focus is sharp on the foreground and soft toward the back.",
    "A ceiling fan with wooden blades hangs above the bed.",
    "The floor is covered with a worn Persian rug.",
    "Several potted cacti are lined up along the shelf.",
    "A jogger in a grey hoodie runs along the river path.",
    "The building's facade has tall arched windows.",
    "An orange kayak lies upside down on the sand.",
    "The street is empty except for a single parked scooter.",
    "A chandelier with dozens of crystal drops hangs from the ceiling.",
    "Puffy white clouds drift above the rolling hills.",
    "A toddler holds a balloon shaped like a fish.",
    "The table is set for four, with folded napkins and wine glasses.",
    "Is the person on the right waving or shielding their eyes?",
    "What a striking contrast the red door makes against the grey wall!",
    "The photo appears to have been taken in late autumn.",
    "Dry leaves are piled against the base of the fence.",
    "A black piano occupies the corner of the room.",
    "Someone has left a half-eaten sandwich on the bench.",
    "The reflection of the trees is visible in the shop window.",
    "There is a faint watermark in the lower right corner.",
]

# ---- tricky sentences (one sentence each, however many full stops they hold)
TRICKY = [
    # abbreviations and titles
    "A stone sign at the gate reads St. Mary's Church, founded in 1852.",
    "A brass plaque honours Dr. Lee, the town's first physician.",
    "The mailbox is painted with the names Mr. and Mrs. Alvarez.",
    "The clock tower is approx. 30 m tall and built of red brick.",
    "Several fruits, e.g. apples, pears and plums, fill the bowl.",
    "The logo, i.e. a red circle with a white star, appears twice on the truck.",
    "Tools, wires, tape, etc. are scattered across the workbench.",
    "A poster advertises Lions vs. Tigers on Saturday night.",
    "The player's jersey shows No. 23 in large white numerals.",
    "The spine of the blue book reads Vol. 3 in gold letters.",
    "A caption beneath the chart is labelled Fig. 4 in small print.",
    "The storefront sign says Prof. Higgins' Music Lessons.",
    "The street sign on the corner reads Elm St. and Fifth Ave. in white letters.",
    "A banner welcomes visitors to Mt. Hood National Forest.",
    "The nameplate on the door reads Ms. Okafor, Head Librarian.",
    "A framed certificate from Acme Corp. hangs above the desk.",
    "The sticker on the crate says Made in the U.S.A. in bold type.",
    "A letter on the table is addressed to Sgt. Brown at the station.",
    "The cake is decorated for Mr. Tanaka's retirement party.",
    "Only a few items, e.g. a lamp and a clock, stand on the mantelpiece.",
    "The bottle is labelled approx. 500 ml, though it looks half full.",
    # initials
    "A framed portrait in the hallway is signed J. R. Miller in the lower corner.",
    "The book cover shows the author's name, J.K. Rowling, above the title.",
    "A bronze statue of F. D. Roosevelt stands in the square.",
    "The plaque credits the mural to A. B. Chen and her students.",
    # decimals, measures and times
    "The price tag on the melons says $3.99 per kg.",
    "A digital thermometer on the wall reads 21.5 °C.",
    "The clock above the platform shows 10:45 a.m. and the platform is crowded.",
    "The board lists the next departure at 6:15 p.m. for Boston.",
    "The ruler beside the beetle shows it is about 2.5 cm long.",
    "A speed limit sign shows 35 mph beside a narrow bridge.",
    "The scale in the corner reads 1.2 kg of tomatoes.",
    "The bottle of olive oil holds 0.75 l and is almost empty.",
    "A runner's bib shows the time 3:42:17 under the number 1047.",
    "The screen shows a download at 87.3 % with 2.1 GB remaining.",
    "The version number v2.4.1 is printed under the logo.",
    # quotes and parentheses with terminal punctuation inside
    "A hand-painted banner reading \"Welcome home!\" hangs above the front door.",
    "The neon sign in the window flashes \"Open 24 hours.\" in pink letters.",
    "A chalkboard asks \"Need coffee?\" in looping white script.",
    "A small dog (probably a terrier!) sits on the porch steps.",
    "The mug bears the words \"Don't panic.\" beneath a cartoon towel.",
    "A sticky note on the monitor says \"Back in 5 min.\" in blue ink.",
    "The T-shirt reads \"Why not?\" across the chest.",
    "The woman (who seems to be the owner?) stands behind the register.",
    "A road sign warns \"Slow down!\" before the sharp curve.",
    "The menu board (updated daily, it says.) hangs behind the bar.",
    # URLs, e-mail addresses, file names
    "The browser window shows www.example-bakery.com/menu.html in the address bar.",
    "A flyer on the lamppost gives info@greenfield.co.uk as the contact address.",
    "The window title bar reads report_final_v2.pdf in bold.",
    "A file named IMG_2041.JPG is open in the photo editor.",
    "The banner at the bottom links to https://tickets.example.org/events?id=42 for bookings.",
    "The laptop screen displays a folder called holiday.photos.2019 with dozens of thumbnails.",
    "A QR code sits next to the text shop.example.net, printed in grey.",
    "The script open on the monitor is called train_model.py and has about forty lines.",
    "The email on screen is from j.smith@university.edu and is marked urgent.",
    # colons before lists (inline)
    "The shelf holds three objects: a glass vase, a brass clock and a small lamp.",
    "The sign lists the opening hours: Mon.-Fri. 9 to 5, Sat. 10 to 2.",
    "Four colours dominate the mural: teal, ochre, crimson and black.",
    # ellipses inside a sentence
    "The handwritten note trails off with the words \"see you at...\" and nothing more.",
    "The text on the screen reads loading... while a wheel spins.",
]

# ---- pairs of sentences where the boundary itself is the hard part (each entry: its gold sentences)
HARD_PAIRS = [
    ["The door is slightly ajar...", "A cat sleeps in the doorway."],
    ["The hallway stretches into darkness…", "At its end, a single lamp glows."],
    ["A sign above the till reads \"Cash only.\"", "The cashier is counting coins."],
    ["The graffiti says \"Stay wild!\"", "Below it, someone has drawn a small heart."],
    ["The label on the jar reads \"Homemade jam.\"", "A spoon rests beside it."],
    ["(The photo is slightly out of focus.)", "Even so, the faces are recognisable."],
    ["A child points at the sky (perhaps at a plane?).", "Her father follows her gaze."],
    ["The crates are stamped with the address of a firm in the U.S.", "Each crate is sealed with tape."],
    ["The clock on the wall shows 7:30 a.m.", "Breakfast dishes cover the table."],
    ["The tickets can be bought at https://example.org/tickets.", "A queue has formed at the entrance."],
    ["Questions go to help@example.com.", "The rest of the poster is blank."],
    ["The file on the desktop is called notes.txt.", "Next to it is a folder of images."],
    ["Pens, pencils, rulers, etc.", "All are neatly sorted in a tray."],
    ["The bowl contains apples, oranges, etc.", "A knife lies next to it."],
    ["The speedometer shows 60 km/h.", "Trees blur past the side window."],
    ["The sign reads \"Closed for renovation\".", "Scaffolding covers the front of the shop."],
    ["Is that a heron on the rock?", "It stands perfectly still."],
    ["What a view!", "The valley opens up below the ridge."],
    ["The temperature display shows -3.5 °C.", "Frost covers the car's windscreen."],
    ["The painting hangs slightly crooked.", "\"Untitled, 1998\" is written on a card beside it."],
]

OPENERS = {
    "sharegpt4v": ["The image captures a moment in a quiet town.", "The image presents a detailed scene indoors.",
                   "In this image, we see a lively street at dusk.", "The image showcases a cosy interior."],
    "dci": ["This is a close-up photo of a busy table.", "The photo shows a corner of a room.",
            "This is a wide shot of an open square."],
    "docci": ["A high-angle view of a small courtyard.", "An outdoor medium-close-up view of a shopfront.",
              "An indoor view of a workshop bench, taken on a sunny day."],
    "pixelprose": ["This image displays a storefront on a quiet street.", "This image displays a cluttered desk.",
                   "This image displays a poster on a brick wall."],
    "dreamlip": ["The image shows a calm everyday scene.", "The picture shows a place where people gather."],
    "llava": ["The image depicts a scene with several notable details.", "Here is a detailed description of the image:"],
}
CLOSERS = [
    "The overall atmosphere is peaceful and inviting.", "The style of the image is realistic and candid.",
    "There are no people visible in the image.", "The image conveys a sense of everyday life",
    "Overall, it is a well-composed photograph", "The lighting suggests early morning",
]


def join(sents: list[str]) -> str:
    """Sentences as a caption writes them: spaces between, a line break after one that ends with a colon."""
    return "".join(s + ("\n" if s.endswith(":") else " ") for s in sents).strip()


def caption(rng: random.Random, style: str) -> tuple[str, list[str]]:
    """(raw text, gold sentences) of one caption in `style`."""
    sents = [rng.choice(OPENERS[style])]
    body = rng.sample(PLAIN, rng.randint(4, 8)) + rng.sample(TRICKY, rng.randint(1, 3))
    rng.shuffle(body)
    groups = [[s] for s in body]
    if rng.random() < 0.6:
        groups.insert(rng.randint(0, len(groups)), rng.choice(HARD_PAIRS))
    for g in groups:
        sents.extend(g)
    if style in ("llava", "pixelprose") and rng.random() < 0.7:
        return list_caption(rng, style, sents)
    if style == "dci" and rng.random() < 0.5:
        return numbered_steps(rng, sents)
    if rng.random() < 0.4:
        sents.append(rng.choice(CLOSERS))
    if rng.random() < 0.2 and sents[-1].endswith("."):  # no final punctuation
        sents[-1] = sents[-1][:-1]
    return join(sents), sents


LIST_HEADS = [("Key elements of the image:", ["**Foreground**: ", "**Middle ground**: ", "**Background**: "]),
              ("The scene includes the following items:", ["", "", ""]),
              ("Notable details:", ["**Colours**: ", "**Text**: ", "**Lighting**: "])]
ITEMS = ["a red bicycle leaning on a post", "two women chatting at a café table", "a blue door with a brass knocker",
         "warm light from the street lamps", "a sign with the text \"Fresh bread daily\"",
         "muted greens and browns with a few red accents", "a dog asleep under the bench",
         "several potted plants on the balcony", "a poster for Dr. Seuss Day at the library",
         "the name J. Smith painted on a van", "soft shadows from the late sun", "a price list starting at $2.50"]


def list_caption(rng: random.Random, style: str, sents: list[str]) -> tuple[str, list[str]]:
    """Markdown-style list: an intro, a colon line, items on their own lines (with or without final
    punctuation), then more prose."""
    head, labels = rng.choice(LIST_HEADS)
    items = rng.sample(ITEMS, 3)
    bullet = rng.choice(["- ", "* ", "1. ", "• "])
    punct = rng.random() < 0.5
    lines, gold = [join(sents[:3]), head], [*sents[:3], head]
    for i, (label, item) in enumerate(zip(labels, items)):
        text = item[0].upper() + item[1:] + ("." if punct else "")
        b = f"{i + 1}. " if bullet == "1. " else bullet
        lines.append(f"{b}{label}{text}")
        gold.append(f"{label.replace('**', '')}{text}")
    rest = sents[3:]
    if rest:
        lines.append(join(rest))
        gold.extend(rest)
    return "\n".join(lines), gold


STEPS = ["Open the lid of the box.", "Lift out the tray", "Set the tray on the table.", "Read the note (it says \"Enjoy!\")",
         "Plug in the lamp.", "Press the switch twice"]


def numbered_steps(rng: random.Random, sents: list[str]) -> tuple[str, list[str]]:
    """A description followed by numbered steps on their own lines (printed instructions in the image)."""
    steps = rng.sample(STEPS, 3)
    intro = "A printed card in the image lists three steps:"
    lines = [join(sents), intro] + [f"{i + 1}. {s}" for i, s in enumerate(steps)]
    return "\n".join(lines), [*sents, intro, *steps]


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from pipeline.sentences import normalize

    rng = random.Random(23)
    styles = list(OPENERS)
    out = []
    for i in range(330):
        style = styles[i % len(styles)]
        text, gold = caption(rng, style)
        gold = [unicodedata.normalize("NFKC", g) for g in gold]  # as the stage normalises ("…" -> "...")
        body = normalize(text)
        # the gold sentences, in order, are the normalised caption with only whitespace between them
        assert "".join(body.split()) == "".join("".join(gold).split()), (text, gold)
        assert all(body.find(s) >= 0 for s in gold), (text, gold)
        out.append({"id": f"{style}-{i:03d}", "style": style, "text": text, "sentences": gold})
    path = Path(__file__).with_name("sentences_gold.jsonl")
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    n_sents = sum(len(r["sentences"]) for r in out)
    print(f"{path}: {len(out)} captions, {n_sents} sentences, "
          f"mean {sum(len(r['text'].split()) for r in out) / len(out):.0f} words")


if __name__ == "__main__":
    main()
