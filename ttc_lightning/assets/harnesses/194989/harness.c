/* Harness for ImageMagick6 ReadPSDChannelPixels (coders/psd.c, CVE-2022-32545).
 *
 * Stand-ins follow an ImageMagick6 Q16 build with HDRI support, the configuration in which the
 * CVE's UBSan report arises: Quantum is a float (magick/magick-type.h) and
 * ScaleCharToQuantum(b) = 257.0*b. The pixel cache is one heap array of PixelPacket (and one
 * of IndexPacket) per image; GetAuthenticPixels returns a row of it. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

typedef enum { MagickFalse = 0, MagickTrue = 1 } MagickBooleanType;
typedef enum { UndefinedEndian, LSBEndian, MSBEndian } EndianType;
typedef enum { UndefinedClass, DirectClass, PseudoClass } ClassType;
typedef enum { UndefinedColorspace, sRGBColorspace, GRAYColorspace, CMYKColorspace } ColorspaceType;

/* magick-type.h, MAGICKCORE_QUANTUM_DEPTH 16 with MAGICKCORE_HDRI_SUPPORT */
typedef float MagickFloatType;
typedef double MagickRealType;
typedef MagickFloatType Quantum;
#define QuantumRange 65535.0
typedef Quantum IndexPacket;          /* pixel.h */
#define IsNaN(a) isnan(a)

typedef struct _PixelPacket {
  Quantum blue, green, red, opacity;
} PixelPacket;

typedef struct _ExceptionInfo { int severity; } ExceptionInfo;

typedef struct _Image {
  ClassType storage_class;
  ColorspaceType colorspace;
  MagickBooleanType matte;
  size_t columns, rows, depth, colors;
  PixelPacket *colormap;
  PixelPacket *pixels;        /* columns*rows, heap */
  IndexPacket *indexes;       /* columns*rows, heap; NULL for DirectClass non-CMYK */
  ssize_t last_row;           /* the row GetAuthenticPixels last returned */
} Image;

/* cache.c */
static PixelPacket *GetAuthenticPixels(Image *image, const ssize_t x, const ssize_t y,
                                       const size_t columns, const size_t rows,
                                       ExceptionInfo *exception)
{
  (void) exception;
  if (x < 0 || y < 0 || rows != 1 || (size_t) x + columns > image->columns ||
      (size_t) y >= image->rows)
    return (PixelPacket *) NULL;
  image->last_row = y;
  return image->pixels + (size_t) y * image->columns + x;
}
static IndexPacket *GetAuthenticIndexQueue(const Image *image)
{
  if (image->indexes == NULL) return NULL;
  return image->indexes + (size_t) image->last_row * image->columns;
}
static MagickBooleanType SyncAuthenticPixels(Image *image, ExceptionInfo *exception)
{
  (void) image; (void) exception;
  return MagickTrue;
}

/* quantum.h / quantum-private.h (Q16, HDRI) */
static inline Quantum ClampToQuantum(const MagickRealType quantum) { return (Quantum) quantum; }
static inline Quantum ScaleCharToQuantum(const unsigned char value) { return (Quantum) (257.0*value); }
static inline Quantum ScaleShortToQuantum(const unsigned short value) { return (Quantum) value; }
static inline unsigned char ScaleQuantumToChar(const Quantum quantum)
{
  if ((IsNaN(quantum) != 0) || (quantum <= 0.0)) return 0;
  if ((quantum/257.0) >= 255.0) return 255;
  return (unsigned char) (quantum/257.0+0.5);
}
static inline const unsigned char *PushShortPixel(const EndianType endian,
  const unsigned char *pixels, unsigned short *pixel)
{
  unsigned int quantum;
  if (endian == LSBEndian) {
    quantum=(unsigned int) *pixels++;
    quantum|=(unsigned int) (*pixels++ << 8);
    *pixel=(unsigned short) (quantum & 0xffff);
    return pixels;
  }
  quantum=(unsigned int) (*pixels++ << 8);
  quantum|=(unsigned int) *pixels++;
  *pixel=(unsigned short) (quantum & 0xffff);
  return pixels;
}
static inline const unsigned char *PushFloatPixel(const EndianType endian,
  const unsigned char *pixels, MagickFloatType *pixel)
{
  union { unsigned int unsigned_value; MagickFloatType float_value; } quantum;
  if (endian == LSBEndian) {
    quantum.unsigned_value=((unsigned int) *pixels++);
    quantum.unsigned_value|=((unsigned int) *pixels++ << 8);
    quantum.unsigned_value|=((unsigned int) *pixels++ << 16);
    quantum.unsigned_value|=((unsigned int) *pixels++ << 24);
    *pixel=quantum.float_value;
    return pixels;
  }
  quantum.unsigned_value=((unsigned int) *pixels++ << 24);
  quantum.unsigned_value|=((unsigned int) *pixels++ << 16);
  quantum.unsigned_value|=((unsigned int) *pixels++ << 8);
  quantum.unsigned_value|=((unsigned int) *pixels++);
  *pixel=quantum.float_value;
  return pixels;
}

/* pixel-accessor.h */
#define GetPixelIndex(indexes)  (*(indexes))
#define GetPixelRed(pixel) ((pixel)->red)
#define SetPixelAlpha(pixel,value) ((pixel)->opacity=(Quantum) (QuantumRange-(value)))
#define SetPixelBlue(pixel,value) ((pixel)->blue=(Quantum) (value))
#define SetPixelGreen(pixel,value) ((pixel)->green=(Quantum) (value))
#define SetPixelIndex(indexes,value) (*(indexes)=(IndexPacket) (value))
#define SetPixelOpacity(pixel,value) ((pixel)->opacity=(Quantum) (value))
#define SetPixelRed(pixel,value) ((pixel)->red=(Quantum) (value))
#define SetPixelRGBO(pixel,packet) \
{ \
  SetPixelRed(pixel,(packet)->red); \
  SetPixelGreen(pixel,(packet)->green); \
  SetPixelBlue(pixel,(packet)->blue); \
  SetPixelOpacity(pixel,(packet)->opacity); \
}

/* colormap-private.h (the exception it raises is left out) */
static inline IndexPacket ConstrainColormapIndex(Image *image, const ssize_t index)
{
  if ((index < 0) || (index >= (ssize_t) image->colors))
    return (IndexPacket) 0;
  return (IndexPacket) index;
}
static inline MagickBooleanType IssRGBCompatibleColorspace(const ColorspaceType colorspace)
{
  return (colorspace == sRGBColorspace || colorspace == GRAYColorspace) ? MagickTrue : MagickFalse;
}

/* coders/psd.c, as of the fix's parent */
static inline size_t GetPSDPacketSize(const Image *image)
{
  if (image->storage_class == PseudoClass)
    {
      if (image->colors > 256)
        return(2);
    }
  if (image->depth > 16)
    return(4);
  if (image->depth > 8)
    return(2);
  return(1);
}

static inline void SetPSDPixel(Image *image,const size_t channels,
  const ssize_t type,const size_t packet_size,const Quantum pixel,PixelPacket *q,
  IndexPacket *indexes,ssize_t x)
{
  if (image->storage_class == PseudoClass)
    {
      PixelPacket *color;
      IndexPacket index;

      index=(IndexPacket) pixel;
      if (packet_size == 1)
        index=(IndexPacket) ScaleQuantumToChar(index);
      index=ConstrainColormapIndex(image,(ssize_t) index);
      if (type == 0)
        SetPixelIndex(indexes+x,index);
      if ((type == 0) && (channels > 1))
        return;
      color=image->colormap+(ssize_t) GetPixelIndex(indexes+x);
      if (type != 0)
        SetPixelAlpha(color,pixel);
      SetPixelRGBO(q,color);
      return;
    }
  switch (type)
  {
    case -1: SetPixelAlpha(q,pixel); break;
    case -2:
    case 0:
      SetPixelRed(q,pixel);
      if ((channels < 3) || (type == -2))
        {
          SetPixelGreen(q,GetPixelRed(q));
          SetPixelBlue(q,GetPixelRed(q));
        }
      break;
    case -3:
    case 1: SetPixelGreen(q,pixel); break;
    case -4:
    case 2: SetPixelBlue(q,pixel); break;
    case 3:
      if (image->colorspace == CMYKColorspace)
        SetPixelIndex(indexes+x,pixel);
      else
        if (image->matte != MagickFalse)
          SetPixelAlpha(q,pixel);
      break;
    case 4:
      if ((IssRGBCompatibleColorspace(image->colorspace) != MagickFalse) && (channels > 3))
        break;
      if (image->matte != MagickFalse)
        SetPixelAlpha(q,pixel);
      break;
  }
}

#include "function.c"

/* ---- driver ---------------------------------------------------------------------------------- */

/* A PSD image as ReadPSDImage sets it up: Bitmap/Grayscale modes below 32 bits get a 256-entry
 * gray colormap (AcquireImageColormap) and are PseudoClass; the others are DirectClass. */
static Image *new_image(size_t columns, size_t rows, size_t depth, ClassType cls)
{
  Image *image = calloc(1, sizeof *image);
  size_t i;
  image->storage_class = cls;
  image->colorspace = cls == PseudoClass ? GRAYColorspace : sRGBColorspace;
  image->columns = columns;
  image->rows = rows;
  image->depth = depth;
  image->pixels = calloc(columns * rows, sizeof(PixelPacket));
  for (i = 0; i < columns * rows; i++) {
    image->pixels[i].red = image->pixels[i].green = image->pixels[i].blue = 1234.0f;
    image->pixels[i].opacity = 0.0f;
  }
  if (cls == PseudoClass) {
    image->colors = 256;
    image->colormap = calloc(256, sizeof(PixelPacket));
    for (i = 0; i < 256; i++) {
      image->colormap[i].red = image->colormap[i].green = image->colormap[i].blue =
        (Quantum) (i * (QuantumRange / 255.0));
      image->colormap[i].opacity = 0.0f;
    }
    image->indexes = calloc(columns * rows, sizeof(IndexPacket));
  }
  return image;
}

static void free_image(Image *image)
{
  free(image->pixels);
  free(image->colormap);
  free(image->indexes);
  free(image);
}

/* Runs one row; `data` is copied into a heap buffer of exactly the PSD row size. */
static MagickBooleanType read_row(Image *image, size_t channels, ssize_t row, ssize_t type,
                                  const unsigned char *data, size_t n)
{
  ExceptionInfo exception = {0};
  unsigned char *pixels = malloc(n);
  MagickBooleanType status;
  memcpy(pixels, data, n);
  status = ReadPSDChannelPixels(image, channels, row, type, pixels, &exception);
  free(pixels);
  return status;
}

static int check_rgb(const PixelPacket *q, float r, float g, float b, float o)
{
  if (q->red != r || q->green != g || q->blue != b || q->opacity != o) {
    fprintf(stderr, "pixel r=%g g=%g b=%g o=%g, want %g %g %g %g\n",
            q->red, q->green, q->blue, q->opacity, r, g, b, o);
    return 1;
  }
  return 0;
}

/* depth-1 row: bit set = black (index 0), clear = white (index 255) */
static int check_bits(Image *image, ssize_t row, const char *bits)
{
  size_t x;
  int r = 0;
  for (x = 0; x < image->columns; x++) {
    const PixelPacket *q = image->pixels + row * image->columns + x;
    float v = bits[x] == '1' ? 0.0f : 65535.0f;
    float idx = bits[x] == '1' ? 0.0f : 255.0f;
    r |= check_rgb(q, v, v, v, 0.0f);
    if (image->indexes[row * image->columns + x] != idx) {
      fprintf(stderr, "index[%zu]=%g, want %g\n", x, image->indexes[row * image->columns + x], idx);
      r = 1;
    }
  }
  return r;
}

int main(int argc, char **argv)
{
  const char *c;
  int r = 0;
  if (argc < 2) return 2;
  c = argv[1];

  if (!strcmp(c, "bitmap_row")) {
    /* a 1-bit Bitmap-mode PSD row of 8 pixels: 0xA5 = 10100101 */
    static const unsigned char data[] = { 0xA5 };
    Image *image = new_image(8, 2, 1, PseudoClass);
    r |= read_row(image, 1, 1, 0, data, sizeof data) != MagickTrue;
    r |= check_bits(image, 1, "10100101");
    free_image(image);
    return r;
  }
  if (!strcmp(c, "bitmap_partial_row")) {
    /* 10 pixels: a full byte and 2 bits of the next */
    static const unsigned char data[] = { 0x00, 0x40 };
    Image *image = new_image(10, 1, 1, PseudoClass);
    r |= read_row(image, 1, 0, 0, data, sizeof data) != MagickTrue;
    r |= check_bits(image, 0, "0000000001");
    free_image(image);
    return r;
  }
  if (!strcmp(c, "gray8_indexed")) {
    static const unsigned char data[] = { 0, 1, 128, 255 };
    Image *image = new_image(4, 1, 8, PseudoClass);
    size_t x;
    r |= read_row(image, 1, 0, 0, data, sizeof data) != MagickTrue;
    for (x = 0; x < 4; x++) {
      float v = (float) (data[x] * 257.0);
      r |= check_rgb(image->pixels + x, v, v, v, 0.0f);
      r |= image->indexes[x] != (float) data[x];
    }
    free_image(image);
    return r;
  }
  if (!strcmp(c, "rgb16_green")) {
    /* 16-bit RGB, green channel (type 1), big-endian samples; red/blue untouched */
    static const unsigned char data[] = { 0x12, 0x34, 0xff, 0xff, 0x00, 0x01 };
    Image *image = new_image(3, 2, 16, DirectClass);
    r |= read_row(image, 3, 1, 1, data, sizeof data) != MagickTrue;
    r |= check_rgb(image->pixels + 3, 1234.0f, 4660.0f, 1234.0f, 0.0f);
    r |= check_rgb(image->pixels + 4, 1234.0f, 65535.0f, 1234.0f, 0.0f);
    r |= check_rgb(image->pixels + 5, 1234.0f, 1.0f, 1234.0f, 0.0f);
    r |= check_rgb(image->pixels + 0, 1234.0f, 1234.0f, 1234.0f, 0.0f);   /* row 0 untouched */
    free_image(image);
    return r;
  }
  if (!strcmp(c, "float32_gray")) {
    /* 32-bit float samples 0.5 and 1.0 (big-endian) into a 1-channel image */
    static const unsigned char data[] = { 0x3f, 0x00, 0x00, 0x00, 0x3f, 0x80, 0x00, 0x00 };
    Image *image = new_image(2, 1, 32, DirectClass);
    r |= read_row(image, 1, 0, 0, data, sizeof data) != MagickTrue;
    r |= check_rgb(image->pixels + 0, 32767.5f, 32767.5f, 32767.5f, 0.0f);
    r |= check_rgb(image->pixels + 1, 65535.0f, 65535.0f, 65535.0f, 0.0f);
    free_image(image);
    return r;
  }
  if (!strcmp(c, "alpha_channel")) {
    /* 8-bit transparency channel (type -1): opacity = QuantumRange - alpha */
    static const unsigned char data[] = { 0, 255, 100 };
    Image *image = new_image(3, 1, 8, DirectClass);
    r |= read_row(image, 4, 0, -1, data, sizeof data) != MagickTrue;
    r |= check_rgb(image->pixels + 0, 1234.0f, 1234.0f, 1234.0f, 65535.0f);
    r |= check_rgb(image->pixels + 1, 1234.0f, 1234.0f, 1234.0f, 0.0f);
    r |= check_rgb(image->pixels + 2, 1234.0f, 1234.0f, 1234.0f, (float) (65535.0 - 25700.0));
    free_image(image);
    return r;
  }
  return 2;
}
