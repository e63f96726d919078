"""Atari Breakout's actions, screen and RAM, measured on the emulator: what the scripted player
(`envs.policies.BreakoutTracker`) and the state probe (`envs.probe`) read. Screen positions are rows y and
columns x of the 210x160 ALE screen; intervals are half-open."""
from __future__ import annotations

# the minimal action set, in ALE's order (get_action_meanings())
BREAKOUT_ACTIONS = ["NOOP", "FIRE", "RIGHT", "LEFT"]
NOOP, FIRE, RIGHT, LEFT = range(len(BREAKOUT_ACTIONS))

# ----- the screen -----
SCREEN_H, SCREEN_W = 210, 160
GRAY, TEAL, RED = (142, 142, 142), (66, 158, 130), (200, 72, 72)
# fixed walls as (y0, y1, x0, x1, colour): top wall, side walls, the bottom corners
WALLS = (
    (17, 32, 0, 160, GRAY),
    (32, 189, 0, 8, GRAY), (32, 189, 152, 160, GRAY),
    (189, 196, 0, 8, TEAL), (189, 195, 152, 160, RED),
)
BRICK_TOP, BRICK_H, BRICK_LEFT, BRICK_W = 57, 6, 8, 8
BRICK_COLOURS = ((200, 72, 72), (198, 108, 58), (180, 122, 48), (162, 162, 42), (72, 160, 72), (66, 72, 200))
BRICK_COLUMNS = 18
NUM_BRICKS = len(BRICK_COLOURS) * BRICK_COLUMNS  # 108
PLAY_TOP, PLAY_LEFT, PLAY_RIGHT = 32, 8, 152  # inside the walls
PADDLE_TOP, PADDLE_H = 189, 4
BALL_COLOUR = PADDLE_COLOUR = RED
BALL_W, BALL_H = 2, 4
PADDLE_W = 16
SHORT_PADDLE_W = 8  # the paddle halves once the ball has broken through the top
# score: 3 digits with leading zeros; a glyph is 3x5 cells of 4x2 screen pixels
DIGIT_TOP, CELL_W, CELL_H = 5, 4, 2
SCORE_SLOTS_X = (36, 52, 68)
GLYPHS = (  # rows of 3 cells, '#' lit; read from the screen after writing known scores into RAM
    ("###", "#.#", "#.#", "#.#", "###"),  # 0
    (".#.", ".#.", ".#.", ".#.", ".#."),  # 1
    ("###", "..#", "###", "#..", "###"),  # 2
    ("###", "..#", ".##", "..#", "###"),  # 3
    ("#.#", "#.#", "###", "..#", "..#"),  # 4
    ("###", "#..", "###", "..#", "###"),  # 5
    ("#..", "#..", "###", "#.#", "###"),  # 6
    ("###", "..#", "..#", "..#", "..#"),  # 7
    ("###", "#.#", "###", "#.#", "###"),  # 8
    ("###", "#.#", "###", "..#", "..#"),  # 9
)

# ----- the RAM, checked against the screen over 400 steps of play -----
#   ball left pixel   = ram[99] - 49,  ball top pixel = ram[101] + 9 (ram[101] == 0: no ball in play)
#   paddle left pixel = ram[72] - 47,  PADDLE_W wide (SHORT_PADDLE_W once the ball has broken through the top)
#   score             = 100 * bcd(ram[76]) + bcd(ram[77])
RAM_BALL_X, RAM_BALL_Y, RAM_PADDLE_X = 99, 101, 72
BALL_X_OFFSET, BALL_Y_OFFSET, PADDLE_X_OFFSET = 49, 9, 47
RAM_SCORE_HUNDREDS, RAM_SCORE_BCD = 76, 77
