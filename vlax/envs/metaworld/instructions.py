"""Hand-written language instructions for the 50 Meta-World tasks (Meta-World ships none).

Each task has several paraphrases; the first one is the canonical instruction (used for evaluation unless a caller
asks for another). Generated episodes draw one paraphrase per episode from the episode's layout seed.
"""

from __future__ import annotations

INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "assembly": (
        "put the ring on the peg",
        "pick up the nut and place it over the peg",
        "slide the ring handle down onto the peg",
        "assemble the ring onto the post",
    ),
    "basketball": (
        "dunk the basketball into the hoop",
        "pick up the ball and put it in the basket",
        "score by placing the ball through the hoop",
        "grab the ball and drop it into the net",
    ),
    "bin-picking": (
        "move the cube from one bin to the other",
        "pick the block out of the left bin and place it in the right bin",
        "transfer the cube into the other bin",
        "grab the cube and put it in the target bin",
    ),
    "box-close": (
        "put the lid on the box",
        "close the box with its lid",
        "pick up the lid and place it on top of the box",
        "cover the box",
    ),
    "button-press": (
        "press the button",
        "push the button in from the front",
        "push the red button forward",
        "press the button on the panel",
    ),
    "button-press-topdown": (
        "press the button from the top",
        "push the button down",
        "press down on the button from above",
        "push the top button downwards",
    ),
    "button-press-topdown-wall": (
        "press the button from the top behind the wall",
        "reach over the wall and push the button down",
        "push the button down past the short wall",
        "press down on the button next to the wall",
    ),
    "button-press-wall": (
        "press the button behind the wall",
        "reach around the wall and push the button",
        "push the button that sits behind a wall",
        "press the button past the wall",
    ),
    "coffee-button": (
        "press the button on the coffee machine",
        "push the coffee machine button",
        "start the coffee machine by pressing its button",
        "press the coffee maker's button",
    ),
    "coffee-pull": (
        "pull the mug away from the coffee machine",
        "take the cup out from under the coffee machine",
        "slide the mug back from the coffee maker",
        "pull the coffee cup to the target",
    ),
    "coffee-push": (
        "push the mug under the coffee machine",
        "slide the cup beneath the coffee maker",
        "move the mug into place under the coffee machine",
        "push the coffee cup to the machine",
    ),
    "dial-turn": (
        "turn the dial",
        "rotate the dial",
        "spin the knob around",
        "twist the dial to the target",
    ),
    "disassemble": (
        "take the ring off the peg",
        "pick the nut up off the peg",
        "remove the ring from the post",
        "lift the ring handle off the peg",
    ),
    "door-close": (
        "close the door",
        "push the door shut",
        "swing the door closed",
        "shut the open door",
    ),
    "door-lock": (
        "lock the door",
        "turn the door lock down",
        "rotate the lock to lock the door",
        "turn the lock knob to the locked position",
    ),
    "door-open": (
        "open the door",
        "pull the door open",
        "swing the door open by its handle",
        "open the door with the handle",
    ),
    "door-unlock": (
        "unlock the door",
        "turn the door lock up",
        "rotate the lock to unlock the door",
        "turn the lock knob to the unlocked position",
    ),
    "drawer-close": (
        "close the drawer",
        "push the drawer shut",
        "slide the drawer closed",
        "push the open drawer in",
    ),
    "drawer-open": (
        "open the drawer",
        "pull the drawer open",
        "slide the drawer out by its handle",
        "pull out the drawer",
    ),
    "faucet-close": (
        "turn the faucet off",
        "close the faucet",
        "rotate the faucet handle to close it",
        "shut off the tap",
    ),
    "faucet-open": (
        "turn the faucet on",
        "open the faucet",
        "rotate the faucet handle to open it",
        "turn on the tap",
    ),
    "hammer": (
        "hammer the nail into the wall",
        "pick up the hammer and drive in the nail",
        "use the hammer to hit the nail",
        "knock the nail in with the hammer",
    ),
    "hand-insert": (
        "put the block into the hole",
        "insert the cube into the hole in the table",
        "move the block into the opening",
        "push the cube into the hole",
    ),
    "handle-press": (
        "press the handle down",
        "push the handle down",
        "press down on the lever handle",
        "push the handle downwards",
    ),
    "handle-press-side": (
        "press the handle down from the side",
        "push the side handle down",
        "press down on the handle from its side",
        "push down the handle facing sideways",
    ),
    "handle-pull": (
        "pull the handle up",
        "lift the handle",
        "pull up on the lever handle",
        "raise the handle",
    ),
    "handle-pull-side": (
        "pull the handle up from the side",
        "lift the side handle",
        "pull up on the handle from its side",
        "raise the handle facing sideways",
    ),
    "lever-pull": (
        "pull the lever up",
        "lift the lever",
        "rotate the lever upwards",
        "raise the lever",
    ),
    "peg-insert-side": (
        "insert the peg into the hole from the side",
        "pick up the peg and push it into the side hole",
        "put the peg into the hole sideways",
        "slide the peg into the box's side opening",
    ),
    "peg-unplug-side": (
        "pull the peg out of the hole",
        "unplug the peg from the side",
        "remove the peg from the side hole",
        "pull the plug out sideways",
    ),
    "pick-out-of-hole": (
        "pick the block out of the hole",
        "lift the cube out of the hole and move it to the goal",
        "take the block out of the opening",
        "pull the cube up out of the hole",
    ),
    "pick-place": (
        "pick up the puck and place it at the goal",
        "grasp the puck and put it on the target",
        "move the puck to the goal position",
        "pick the puck up and set it down at the target",
    ),
    "pick-place-wall": (
        "pick up the puck and place it at the goal behind the wall",
        "lift the puck over the wall and put it on the target",
        "move the puck past the wall to the goal",
        "carry the puck over the wall to the target",
    ),
    "plate-slide": (
        "slide the plate into the goal",
        "push the plate into the net",
        "slide the plate forward into the cabinet",
        "move the plate into the goal",
    ),
    "plate-slide-back": (
        "slide the plate back out of the goal",
        "pull the plate back out of the net",
        "slide the plate back towards you",
        "retrieve the plate from the goal",
    ),
    "plate-slide-back-side": (
        "slide the plate back out of the goal sideways",
        "pull the plate sideways out of the net",
        "slide the plate out to the side",
        "retrieve the plate from the goal from the side",
    ),
    "plate-slide-side": (
        "slide the plate sideways into the goal",
        "push the plate sideways into the net",
        "slide the plate to the side into the cabinet",
        "move the plate sideways into the goal",
    ),
    "push": (
        "push the puck to the goal",
        "slide the puck to the target",
        "push the puck across the table to the goal",
        "move the puck to the target by pushing it",
    ),
    "push-back": (
        "push the puck back to the goal",
        "slide the puck backwards to the target",
        "pull the puck back to the goal position",
        "move the puck back towards the target",
    ),
    "push-wall": (
        "push the puck around the wall to the goal",
        "slide the puck past the wall to the target",
        "push the puck to the goal behind the wall",
        "move the puck around the wall to the target",
    ),
    "reach": (
        "reach the goal position",
        "move the gripper to the target",
        "reach for the target point",
        "bring the hand to the goal",
    ),
    "reach-wall": (
        "reach the goal position behind the wall",
        "move the gripper over the wall to the target",
        "reach past the wall to the goal",
        "bring the hand to the target behind the wall",
    ),
    "shelf-place": (
        "put the block on the shelf",
        "pick up the cube and place it on the shelf",
        "place the block onto the shelf",
        "lift the cube onto the shelf",
    ),
    "soccer": (
        "kick the ball into the goal",
        "push the soccer ball into the net",
        "score a goal with the ball",
        "move the ball into the goal",
    ),
    "stick-pull": (
        "use the stick to pull the container",
        "grab the stick and pull the thermos to the goal",
        "pull the bottle with the stick",
        "hook the container with the stick and drag it back",
    ),
    "stick-push": (
        "use the stick to push the container",
        "grab the stick and push the thermos to the goal",
        "push the bottle with the stick",
        "press the container forward with the stick",
    ),
    "sweep": (
        "sweep the cube off the table",
        "push the block off the edge of the table",
        "sweep the block away",
        "brush the cube off the side",
    ),
    "sweep-into": (
        "sweep the cube into the hole",
        "push the block into the hole",
        "sweep the block into the opening",
        "slide the cube into the hole",
    ),
    "window-close": (
        "close the window",
        "slide the window shut",
        "push the window closed",
        "shut the window",
    ),
    "window-open": (
        "open the window",
        "slide the window open",
        "push the window open",
        "open up the window",
    ),
}


def instruction(task: str, paraphrase: int = 0) -> str:
    """Instruction ``paraphrase`` (wrapped around the number of paraphrases) for ``task``; 0 is canonical."""
    key = task.removesuffix("-v3")
    if key not in INSTRUCTIONS:
        raise ValueError(f"No instructions for Meta-World task {task!r}; known tasks: {', '.join(sorted(INSTRUCTIONS))}")
    options = INSTRUCTIONS[key]
    return options[paraphrase % len(options)]
